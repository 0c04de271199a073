//! How the Kafka clients reach the brokers: plain TCP, TLS with the broker's certificate
//! checked against a CA, SASL (PLAIN, SCRAM) with or without TLS. Set by keys of their own
//! (not `[sink.librdkafka]`) so that they are checked before connecting and the password
//! is held as a secret, never printed.

use std::sync::Mutex;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tracing::warn;

use super::config::{InvalidKafkaConfig, KafkaSinkConfig};

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    /// TLS, the broker's certificate checked against `tls_ca_file` (or the system's CAs)
    /// and its host name.
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// librdkafka's `sasl.mechanism`, those it supports without Kerberos or OAuth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[default]
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// librdkafka properties these keys own, refused in `[sink.librdkafka]`.
pub(super) const SECURITY_PROPERTIES: [(&str, &str); 7] = [
    ("security.protocol", "set `security_protocol` instead"),
    ("ssl.ca.location", "set `tls_ca_file` instead"),
    ("ssl.ca.pem", "set `tls_ca_file` instead"),
    ("sasl.mechanism", "set `sasl_mechanism` instead"),
    ("sasl.mechanisms", "set `sasl_mechanism` instead"),
    ("sasl.username", "set `sasl_username` instead"),
    ("sasl.password", "set `sasl_password` instead"),
];

/// Checks the security keys of `config` and sets their librdkafka properties on `base`.
pub(super) fn apply(
    config: &KafkaSinkConfig,
    base: &mut ClientConfig,
) -> Result<(), InvalidKafkaConfig> {
    let protocol = config.security_protocol;
    base.set("security.protocol", protocol.as_librdkafka());
    match (&config.tls_ca_file, protocol.tls()) {
        (Some(_), false) => {
            return Err(InvalidKafkaConfig::new(
                "tls_ca_file",
                format!(
                    "is set but security_protocol = \"{}\" does not use TLS: set security_protocol = \"ssl\" (or \"sasl_ssl\")",
                    protocol.as_librdkafka()
                ),
            ));
        }
        (Some(path), true) => {
            crate::tls::read_ca_file(path)
                .map_err(|reason| InvalidKafkaConfig::new("tls_ca_file", reason))?;
            base.set("ssl.ca.location", path.display().to_string());
        }
        (None, _) => {}
    }
    if protocol.tls() {
        // librdkafka's default too; set so that no [sink.librdkafka] default can drop it.
        base.set("ssl.endpoint.identification.algorithm", "https");
    }
    let username = config.sasl_username.as_deref();
    let password = config.sasl_password.as_ref();
    if !protocol.sasl() {
        if config.sasl_mechanism.is_some() || username.is_some() || password.is_some() {
            return Err(InvalidKafkaConfig::new(
                "security_protocol",
                "sasl_mechanism, sasl_username or sasl_password is set but security_protocol does not use SASL: set it to \"sasl_ssl\" (or \"sasl_plaintext\")",
            ));
        }
        return Ok(());
    }
    let (Some(username), Some(password)) = (username, password) else {
        return Err(InvalidKafkaConfig::new(
            "sasl_username",
            format!(
                "security_protocol = \"{}\" needs sasl_username and sasl_password (or FERRY_SINK__SASL_PASSWORD)",
                protocol.as_librdkafka()
            ),
        ));
    };
    if username.is_empty() || password.expose_secret().is_empty() {
        return Err(InvalidKafkaConfig::new(
            "sasl_username",
            "sasl_username and sasl_password must not be empty",
        ));
    }
    base.set(
        "sasl.mechanism",
        config.sasl_mechanism.unwrap_or_default().as_librdkafka(),
    )
    .set("sasl.username", username)
    .set("sasl.password", password.expose_secret());
    Ok(())
}

/// The context of the connection probe: keeps the broker's certificate refusal, which
/// librdkafka reports only through this callback (the probe itself just times out), so
/// that the sink can say why it cannot connect.
#[derive(Default)]
pub(super) struct ProbeContext {
    certificate_refused: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let refused = std::io::Error::other(reason.to_owned());
        if crate::tls::is_certificate_failure(&refused) {
            let mut slot = self
                .certificate_refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            slot.get_or_insert_with(|| reason.to_owned());
        } else {
            warn!(error = %error, reason, "kafka connection probe");
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    /// The probe only fetches metadata: it produces nothing to report.
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl ProbeContext {
    /// librdkafka's words for the refused certificate, if it refused one.
    pub(super) fn certificate_refused(&self) -> Option<String> {
        self.certificate_refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn key_of(config: &KafkaSinkConfig) -> String {
        config.validate().expect_err("must be rejected").key
    }

    fn ca_file() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-kafka-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ca.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        path
    }

    #[test]
    fn tls_and_sasl_settings_become_librdkafka_properties() {
        let ca = ca_file();
        let config: KafkaSinkConfig = serde_json::from_value(serde_json::json!({
            "security_protocol": "sasl_ssl",
            "tls_ca_file": ca,
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "relay",
            "sasl_password": "pw-Qx7",
        }))
        .expect("parses");
        let base = config.client_config().expect("valid");
        assert_eq!(base.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(
            base.get("ssl.ca.location"),
            Some(ca.display().to_string().as_str())
        );
        assert_eq!(base.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(base.get("sasl.username"), Some("relay"));
        assert_eq!(base.get("sasl.password"), Some("pw-Qx7"));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pw-Qx7"),
            "the password is redacted: {shown}"
        );
        let plain = KafkaSinkConfig::default().client_config().expect("valid");
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.password"), None);
    }

    #[test]
    fn inconsistent_security_settings_name_the_key() {
        let ca = ca_file();
        let base = KafkaSinkConfig::default;
        assert_eq!(
            key_of(&KafkaSinkConfig {
                tls_ca_file: Some(ca.clone()),
                ..base()
            }),
            "tls_ca_file",
            "a CA without TLS"
        );
        assert_eq!(
            key_of(&KafkaSinkConfig {
                security_protocol: SecurityProtocol::Ssl,
                tls_ca_file: Some("/nonexistent/ca.pem".into()),
                ..base()
            }),
            "tls_ca_file"
        );
        assert_eq!(
            key_of(&KafkaSinkConfig {
                sasl_username: Some("relay".into()),
                ..base()
            }),
            "security_protocol",
            "credentials without SASL"
        );
        assert_eq!(
            key_of(&KafkaSinkConfig {
                security_protocol: SecurityProtocol::SaslSsl,
                sasl_username: Some("relay".into()),
                ..base()
            }),
            "sasl_username",
            "SASL without a password"
        );
        for (key, hint) in [
            ("security.protocol", "security_protocol"),
            ("ssl.ca.location", "tls_ca_file"),
            ("sasl.password", "sasl_password"),
        ] {
            let config = KafkaSinkConfig {
                librdkafka: [(key.to_owned(), "x".to_owned())].into(),
                ..base()
            };
            let err = config.validate().expect_err("owned by a key");
            assert!(err.key.contains(key) && err.reason.contains(hint), "{err}");
        }
        let err = serde_json::from_value::<KafkaSinkConfig>(
            serde_json::json!({ "security_protocol": "tls" }),
        )
        .expect_err("unknown protocol");
        assert!(err.to_string().contains("sasl_ssl"), "{err}");
    }
}
