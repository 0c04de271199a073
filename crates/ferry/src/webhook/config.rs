//! Settings of the HTTP webhook sink and their validation.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use super::signature::SigningKey;
use super::url_template::UrlTemplate;

/// Settings of the webhook sink. `url` is required; the other keys default to:
///
/// - `url`: where each message is POSTed, `http://` or `https://` (TLS by rustls with the
///   Mozilla roots). It may hold the placeholders `{aggregate_type}`, `{aggregate_id}`,
///   `{event_type}` and `{partition}` after the host (in the path or query), e.g.
///   `"https://hooks.example.com/events/{aggregate_type}"`; values are percent-encoded,
///   so they can never add a path segment or a query parameter. No credentials in it:
///   use `bearer_token`.
/// - `signing_secret`: unset means requests are not signed. Otherwise each request gets
///   `webhook-id`, `webhook-timestamp` and `webhook-signature` headers (Standard Webhooks:
///   HMAC-SHA256 over `id.timestamp.body`; see [`super::signature`]). At least 24 bytes;
///   `whsec_<base64>` is decoded first. Never logged or serialised.
/// - `bearer_token`: sent as `Authorization: Bearer <token>`; unset means none.
/// - `connect_timeout_secs = 5`: one TCP (and TLS) connection attempt.
/// - `request_timeout_secs = 30`: one whole request, from sending to the end of the
///   response; a timeout counts as retryable (the receiver dedups by `Idempotency-Key`).
/// - `retry_after_max_secs = 300`: the longest `Retry-After` honoured; longer ones are cut
///   to this.
/// - `source`: the CloudEvents `source` of every event; unset means
///   `ferry://<aggregate_type>`.
/// - `tls_ca_file`: a PEM file of the CA that issued the receiver's certificate, trusted
///   instead of the Mozilla roots (`https://` only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSinkConfig {
    pub url: String,
    pub signing_secret: Option<SecretString>,
    pub bearer_token: Option<SecretString>,
    pub connect_timeout_secs: u64,
    pub request_timeout_secs: u64,
    pub retry_after_max_secs: u64,
    pub source: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for WebhookSinkConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            signing_secret: None,
            bearer_token: None,
            connect_timeout_secs: 5,
            request_timeout_secs: 30,
            retry_after_max_secs: 300,
            source: None,
            tls_ca_file: None,
        }
    }
}

/// A setting of the webhook sink that cannot work, named by its key.
pub type InvalidWebhookConfig = crate::sink_config::InvalidSinkConfig;

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidWebhookConfig {
    InvalidWebhookConfig::new("webhook", key, reason)
}

/// The checked form of a [`WebhookSinkConfig`].
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) url: UrlTemplate,
    pub(crate) signing_key: Option<SigningKey>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_after_max: Duration,
    /// The CA certificates of `tls_ca_file`, the only roots then trusted.
    pub(crate) ca_certificates: Option<Vec<reqwest::Certificate>>,
}

impl WebhookSinkConfig {
    /// Checks every setting without connecting; the error names the first bad key and
    /// what it accepts.
    pub fn validate(&self) -> Result<(), InvalidWebhookConfig> {
        self.check().map(drop)
    }

    pub(crate) fn check(&self) -> Result<Checked, InvalidWebhookConfig> {
        let url = UrlTemplate::parse(&self.url).map_err(|reason| invalid("url", reason))?;
        let ca_certificates = self
            .tls_ca_file
            .as_deref()
            .map(|path| {
                if !self.url.starts_with("https://") {
                    return Err("is set but `url` is not https://".to_owned());
                }
                let pem = crate::tls::read_ca_file(path)?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|err| format!("{}: {err}", path.display()))
            })
            .transpose()
            .map_err(|reason| invalid("tls_ca_file", reason))?;
        let signing_key = self
            .signing_secret
            .as_ref()
            .map(|secret| SigningKey::from_secret(secret.expose_secret()))
            .transpose()
            .map_err(|reason| invalid("signing_secret", reason))?;
        if let Some(token) = &self.bearer_token {
            let token = token.expose_secret();
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "bearer_token",
                    "must be non-empty visible ASCII (no spaces or line breaks)",
                ));
            }
        }
        for (key, value, default) in [
            ("connect_timeout_secs", self.connect_timeout_secs, 5),
            ("request_timeout_secs", self.request_timeout_secs, 30),
        ] {
            if !(1..=3600).contains(&value) {
                return Err(invalid(
                    key,
                    format!("is {value}; allowed is 1 to 3600 (default {default})"),
                ));
            }
        }
        if self.retry_after_max_secs > 86_400 {
            return Err(invalid(
                "retry_after_max_secs",
                format!(
                    "is {}; allowed is 0 (ignore Retry-After) to 86400 (default 300)",
                    self.retry_after_max_secs
                ),
            ));
        }
        crate::sink_config::check_source("webhook", self.source.as_deref())?;
        Ok(Checked {
            url,
            signing_key,
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            retry_after_max: Duration::from_secs(self.retry_after_max_secs),
            ca_certificates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> WebhookSinkConfig {
        WebhookSinkConfig {
            url: "https://hooks.example.com/events/{aggregate_type}".into(),
            ..WebhookSinkConfig::default()
        }
    }

    fn key_of(config: &WebhookSinkConfig) -> &'static str {
        config.validate().expect_err("must be rejected").key
    }

    #[test]
    fn a_url_is_required() {
        assert_eq!(key_of(&WebhookSinkConfig::default()), "url");
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn bad_keys_are_named() {
        let short = WebhookSinkConfig {
            signing_secret: Some("too-short".to_owned().into()),
            ..valid()
        };
        let err = short.validate().expect_err("short secret");
        assert_eq!(err.key, "signing_secret");
        assert!(err.reason.contains("at least 24"), "{err}");
        assert_eq!(
            key_of(&WebhookSinkConfig {
                bearer_token: Some("two words".to_owned().into()),
                ..valid()
            }),
            "bearer_token"
        );
        assert_eq!(
            key_of(&WebhookSinkConfig {
                request_timeout_secs: 0,
                ..valid()
            }),
            "request_timeout_secs"
        );
        assert_eq!(
            key_of(&WebhookSinkConfig {
                connect_timeout_secs: 0,
                ..valid()
            }),
            "connect_timeout_secs"
        );
        assert_eq!(
            key_of(&WebhookSinkConfig {
                retry_after_max_secs: 100_000,
                ..valid()
            }),
            "retry_after_max_secs"
        );
    }

    #[test]
    fn unknown_keys_are_refused_and_secrets_hidden() {
        let err = serde_json::from_str::<WebhookSinkConfig>(r#"{"url":"http://x","secret":"s"}"#)
            .expect_err("unknown key");
        assert!(err.to_string().contains("secret"), "{err}");
        let config: WebhookSinkConfig = serde_json::from_str(
            r#"{"url":"http://x","signing_secret":"s3cret-s3cret-s3cret-s3cret","bearer_token":"t0ken"}"#,
        )
        .expect("parses");
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("t0ken"),
            "{debug}"
        );
    }
}
