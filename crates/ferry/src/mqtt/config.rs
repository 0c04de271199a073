//! Settings of the MQTT sink and their validation.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::topic::TopicTemplate;

/// Largest accepted `max_in_flight`: MQTT packet ids are 16-bit, so no client can have
/// more unacknowledged QoS 1/2 publishes than this on one connection.
pub const MAX_IN_FLIGHT_LIMIT: usize = u16::MAX as usize - 1;

/// Settings of the MQTT sink. Every key is optional; the defaults are:
///
/// - `url = "mqtt://127.0.0.1:1883"`: the broker, `mqtt://host:port` (plain TCP; the
///   port defaults to 1883) or `mqtts://host:port` (TLS; the port defaults to 8883). The broker must speak MQTT 5 (Mosquitto 2, EMQX, HiveMQ,
///   VerneMQ do): CloudEvents attributes travel as MQTT 5 user properties.
/// - `topic_template = "ferry/{aggregate_type}/{aggregate_id}"`: the topic of each
///   message, with the placeholders `{aggregate_type}`, `{aggregate_id}`, `{event_type}`
///   and `{partition}`. MQTT keeps order per topic, so a topic per aggregate (the default)
///   or per partition keeps each aggregate's versions in order for every subscriber. A
///   value containing `/`, `+`, `#` or NUL has it replaced with `_` (it must not add a
///   topic level or become a wildcard); an empty value becomes `_`.
/// - `qos = 1`: 1 (at least once, PUBACK) or 2 (exactly once per connection, PUBCOMP).
///   0 is refused: the broker acknowledges nothing, so a message lost on the way would be
///   marked published.
/// - `client_id_prefix = "ferry-"`: each connection's client id is this prefix plus a
///   random suffix, so that two relays never take over each other's session.
/// - `username`, `password`: broker credentials; unset means none. The password is never
///   logged or serialised.
/// - `keep_alive_secs = 30`: MQTT keep-alive; a dead connection is noticed within 1.5×.
/// - `max_in_flight = 1024`: publishes awaiting their ack, across all partitions. The
///   broker's Receive Maximum (sent in CONNACK) lowers it further.
/// - `ack_timeout_secs = 10`: how long to wait for one ack before the publish counts as
///   failed and is retried.
/// - `connect_timeout_secs = 10`: how long one connection attempt may take.
/// - `source`: the CloudEvents `source` of every event; unset means
///   `ferry://<aggregate_type>`.
/// - `tls_ca_file`: with `mqtts://`, a PEM file of the CA that issued the broker's
///   certificate, trusted instead of the public (webpki) roots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSinkConfig {
    pub url: String,
    pub topic_template: String,
    pub qos: u8,
    pub client_id_prefix: String,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub keep_alive_secs: u64,
    pub max_in_flight: usize,
    pub ack_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub source: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for MqttSinkConfig {
    fn default() -> Self {
        Self {
            url: "mqtt://127.0.0.1:1883".into(),
            topic_template: "ferry/{aggregate_type}/{aggregate_id}".into(),
            qos: 1,
            client_id_prefix: "ferry-".into(),
            username: None,
            password: None,
            keep_alive_secs: 30,
            max_in_flight: 1024,
            ack_timeout_secs: 10,
            connect_timeout_secs: 10,
            source: None,
            tls_ca_file: None,
        }
    }
}

/// A setting of the mqtt sink that cannot work, named by its key.
pub type InvalidMqttConfig = crate::sink_config::InvalidSinkConfig;

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidMqttConfig {
    InvalidMqttConfig::new("mqtt", key, reason)
}

/// The checked form of an [`MqttSinkConfig`], ready to connect with.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `mqtts://`: the TLS client config, with the configured CA or the webpki roots.
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub(crate) template: TopicTemplate,
    pub(crate) qos: rumqttc::v5::mqttbytes::QoS,
    pub(crate) keep_alive: Duration,
    pub(crate) ack_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

impl MqttSinkConfig {
    /// Checks every setting without connecting; the error names the first bad key and
    /// what it accepts.
    pub fn validate(&self) -> Result<(), InvalidMqttConfig> {
        self.check().map(drop)
    }

    /// rumqttc options for a connection to the configured broker with `client_id`: address,
    /// keep-alive and credentials (what the sink and any other client of the same broker,
    /// such as the bench's subscriber, share).
    pub fn client_options(
        &self,
        client_id: String,
    ) -> Result<rumqttc::v5::MqttOptions, InvalidMqttConfig> {
        let checked = self.check()?;
        let mut options = rumqttc::v5::MqttOptions::new(client_id, checked.host, checked.port);
        options.set_keep_alive(checked.keep_alive);
        if let Some(tls) = checked.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        if let Some(username) = &self.username {
            let password = self
                .password
                .as_ref()
                .map(|p| secrecy::ExposeSecret::expose_secret(p).to_owned())
                .unwrap_or_default();
            options.set_credentials(username.clone(), password);
        }
        Ok(options)
    }

    pub(crate) fn check(&self) -> Result<Checked, InvalidMqttConfig> {
        let (host, port, tls) = parse_url(&self.url)?;
        let tls = match (tls, &self.tls_ca_file) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(invalid(
                    "tls_ca_file",
                    "is set but `url` is not mqtts://: use mqtts://host:8883 for TLS",
                ));
            }
            (true, ca_file) => Some(
                crate::tls::rustls_client_config(ca_file.as_deref())
                    .map_err(|reason| invalid("tls_ca_file", reason))?,
            ),
        };
        let template = TopicTemplate::parse(&self.topic_template)
            .map_err(|reason| invalid("topic_template", reason))?;
        let qos = match self.qos {
            1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            2 => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            0 => {
                return Err(invalid(
                    "qos",
                    "0 (at most once) is refused: the broker acknowledges nothing, so a message \
                     lost on the way would be marked published; use 1 (default) or 2",
                ));
            }
            other => {
                return Err(invalid(
                    "qos",
                    format!("is {other}; MQTT has QoS 1 (default) and 2"),
                ));
            }
        };
        if self.client_id_prefix.len() > 64
            || self
                .client_id_prefix
                .contains(|c: char| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "client_id_prefix",
                "must be at most 64 characters without spaces or control characters \
                 (default \"ferry-\"); a random suffix is added per connection",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(invalid(
                "password",
                "is set without `username`; set both, or neither",
            ));
        }
        if !(5..=3600).contains(&self.keep_alive_secs) {
            return Err(invalid(
                "keep_alive_secs",
                format!(
                    "is {}; allowed is 5 to 3600 (default 30)",
                    self.keep_alive_secs
                ),
            ));
        }
        crate::sink_config::check_count(
            "mqtt",
            "max_in_flight",
            self.max_in_flight,
            MAX_IN_FLIGHT_LIMIT,
            1024,
        )?;
        if self.ack_timeout_secs == 0 {
            return Err(invalid(
                "ack_timeout_secs",
                "must be at least 1 second (default 10)",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "connect_timeout_secs",
                "must be at least 1 second (default 10)",
            ));
        }
        crate::sink_config::check_source("mqtt", self.source.as_deref())?;
        Ok(Checked {
            host,
            port,
            tls,
            template,
            qos,
            keep_alive: Duration::from_secs(self.keep_alive_secs),
            ack_timeout: Duration::from_secs(self.ack_timeout_secs),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
        })
    }
}

/// `mqtt://host[:port]` (or `tcp://`) into host and port; `mqtts://` (or `ssl://`) also
/// says TLS.
fn parse_url(text: &str) -> Result<(String, u16, bool), InvalidMqttConfig> {
    let bad = |why: &str| {
        invalid(
            "url",
            format!(
                "{text:?} {why}; expected mqtt://host:port or mqtts://host:port, e.g. \"mqtt://127.0.0.1:1883\""
            ),
        )
    };
    let url = url::Url::parse(text).map_err(|err| bad(&format!("is not a URL ({err})")))?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        "ws" | "wss" => {
            return Err(bad(
                "uses WebSockets, which this sink does not support; use mqtt:// or mqtts://",
            ));
        }
        _ => return Err(bad("has an unknown scheme")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "carries credentials; put them in `username` and `password` instead, so that they \
             are never logged",
        ));
    }
    if url.path() != "" && url.path() != "/" || url.query().is_some() {
        return Err(bad("has a path or query, which MQTT has no use for"));
    }
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| bad("has no host"))?;
    // The url crate keeps the brackets of an IPv6 literal; the socket address needs them off.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let default_port = if tls { 8883 } else { 1883 };
    Ok((host, url.port().unwrap_or(default_port), tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(config: &MqttSinkConfig) -> &'static str {
        config.validate().expect_err("must be rejected").key
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(MqttSinkConfig::default().validate(), Ok(()));
        let checked = MqttSinkConfig::default().check().expect("valid");
        assert_eq!((checked.host.as_str(), checked.port), ("127.0.0.1", 1883));
    }

    #[test]
    fn urls() {
        let parse = |url: &str| parse_url(url).map_err(|err| err.reason);
        assert_eq!(parse("mqtt://broker"), Ok(("broker".into(), 1883, false)));
        assert_eq!(parse("tcp://[::1]:1999"), Ok(("::1".into(), 1999, false)));
        assert_eq!(parse("mqtts://broker"), Ok(("broker".into(), 8883, true)));
        for bad in [
            "",
            "broker:1883",
            "http://broker",
            "mqtt://user:pw@broker",
            "mqtt://broker/topic",
            "wss://broker",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bad_keys_are_named() {
        let base = MqttSinkConfig::default;
        let qos0 = MqttSinkConfig { qos: 0, ..base() };
        let err = qos0.validate().expect_err("qos 0");
        assert_eq!(err.key, "qos");
        assert!(err.reason.contains("lost"), "{err}");
        assert_eq!(key_of(&MqttSinkConfig { qos: 3, ..base() }), "qos");
        for template in ["ferry/+/{aggregate_id}", "ferry/#", "", "$SYS/{event_type}"] {
            let config = MqttSinkConfig {
                topic_template: template.into(),
                ..base()
            };
            assert_eq!(key_of(&config), "topic_template", "{template:?}");
        }
        assert_eq!(
            key_of(&MqttSinkConfig {
                tls_ca_file: Some("/nonexistent/ca.pem".into()),
                ..base()
            }),
            "tls_ca_file",
            "a CA file without mqtts://"
        );
        assert_eq!(
            key_of(&MqttSinkConfig {
                url: "mqtts://x".into(),
                tls_ca_file: Some("/nonexistent/ca.pem".into()),
                ..base()
            }),
            "tls_ca_file"
        );
        assert_eq!(
            key_of(&MqttSinkConfig {
                max_in_flight: 0,
                ..base()
            }),
            "max_in_flight"
        );
        assert_eq!(
            key_of(&MqttSinkConfig {
                keep_alive_secs: 1,
                ..base()
            }),
            "keep_alive_secs"
        );
        assert_eq!(
            key_of(&MqttSinkConfig {
                ack_timeout_secs: 0,
                ..base()
            }),
            "ack_timeout_secs"
        );
        assert_eq!(
            key_of(&MqttSinkConfig {
                client_id_prefix: "a b".into(),
                ..base()
            }),
            "client_id_prefix"
        );
        assert_eq!(
            key_of(&MqttSinkConfig {
                password: Some("pw".to_owned().into()),
                ..base()
            }),
            "password"
        );
    }

    #[test]
    fn unknown_keys_are_refused_and_the_password_is_hidden() {
        let err =
            serde_json::from_str::<MqttSinkConfig>(r#"{"topic":"x"}"#).expect_err("unknown key");
        assert!(err.to_string().contains("topic"), "{err}");
        let config: MqttSinkConfig =
            serde_json::from_str(r#"{"username":"u","password":"s3cret"}"#).expect("parses");
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
