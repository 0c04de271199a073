//! The `[service]` section of `ferry.toml` and the settings the service runs with.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::auth::{Scope, Tokens};
use crate::store::AckPolicy;

/// Shortest bearer token accepted: anything shorter can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Largest `max_payload_bytes` accepted.
pub const MAX_PAYLOAD_LIMIT: usize = 64 * 1024 * 1024;

/// Settings of `ferry serve`. Every key is optional except `tokens`; the defaults are:
///
/// - `listen = "127.0.0.1:8080"`: the HTTP API's address.
/// - `run_relay = true`: run the relay in the same process. Set false when separate
///   `ferry relay` processes move the outbox.
/// - `max_payload_bytes = 262144`: the largest payload a prepare accepts (after base64
///   decoding); at most the outbox's `max_payload_bytes`.
/// - `prepare_timeout_secs = 60`: how long a prepared message waits for confirm or cancel
///   before it is checked back.
/// - `check_timeout_ms = 5000`: how long one check-back request may take.
/// - `max_checks = 10`: inconclusive check-backs (`unknown` or an error) before the message
///   becomes `check_failed`.
/// - `check_backoff_initial_ms = 5000`, `check_backoff_max_ms = 300000`: the wait after
///   an inconclusive check, doubled after each one up to the maximum.
/// - `check_concurrency = 16`: check-backs in flight at once per instance.
/// - `check_bearer_token`: sent as `Authorization: Bearer …` on check-backs; unset: none.
/// - `ack_timeout_secs = 300`: how long a delivered message waits for its ack before it is
///   redelivered; doubled for each further delivery up to `ack_timeout_max_secs = 3600`.
/// - `max_deliveries = 5`: deliveries before a message is dead-lettered.
/// - `poll_interval_ms = 250`: how often the service looks for published, due and expired
///   messages (delivery, check-back and redelivery latency).
/// - `finished_retention_secs = 604800`: completed and cancelled messages are deleted this
///   long after their last change (7 days); check_failed and dead_lettered ones are kept.
/// - `tokens`: `[[service.tokens]]` entries with `name`, `scopes` (`producer`, `consumer`,
///   `admin`) and either `token` or `token_env` (the name of an environment variable that
///   holds it). At least one is required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    pub listen: String,
    pub run_relay: bool,
    pub max_payload_bytes: usize,
    pub prepare_timeout_secs: u64,
    pub check_timeout_ms: u64,
    pub max_checks: u32,
    pub check_backoff_initial_ms: u64,
    pub check_backoff_max_ms: u64,
    pub check_concurrency: u32,
    pub check_bearer_token: Option<SecretString>,
    pub ack_timeout_secs: u64,
    pub ack_timeout_max_secs: u64,
    pub max_deliveries: u32,
    pub poll_interval_ms: u64,
    pub finished_retention_secs: u64,
    pub tokens: Vec<TokenConfig>,
}

/// One bearer token and what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Names the caller in logs and reasons (the token itself is never logged).
    pub name: String,
    pub token: Option<SecretString>,
    /// An environment variable holding the token, so the file need not.
    pub token_env: Option<String>,
    pub scopes: Vec<Scope>,
}

impl TokenConfig {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            run_relay: true,
            max_payload_bytes: 256 * 1024,
            prepare_timeout_secs: 60,
            check_timeout_ms: 5000,
            max_checks: 10,
            check_backoff_initial_ms: 5000,
            check_backoff_max_ms: 300_000,
            check_concurrency: 16,
            check_bearer_token: None,
            ack_timeout_secs: 300,
            ack_timeout_max_secs: 3600,
            max_deliveries: 5,
            poll_interval_ms: 250,
            finished_retention_secs: 7 * 24 * 3600,
            tokens: Vec::new(),
        }
    }
}

/// A `[service]` setting that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting service.{key}: {reason}")]
#[non_exhaustive]
pub struct InvalidServiceConfig {
    pub key: String,
    pub reason: String,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> InvalidServiceConfig {
    InvalidServiceConfig {
        key: key.into(),
        reason: reason.into(),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), InvalidServiceConfig> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is out of range: use {min} to {max}"),
        ));
    }
    Ok(())
}

impl ServiceConfig {
    /// Checks every setting without reading the environment (`token_env` is resolved by
    /// [`Self::tokens`] when the service starts).
    pub fn validate(&self) -> Result<(), InvalidServiceConfig> {
        self.listen_addr()?;
        in_range(
            "max_payload_bytes",
            self.max_payload_bytes,
            1,
            MAX_PAYLOAD_LIMIT,
        )?;
        in_range("prepare_timeout_secs", self.prepare_timeout_secs, 1, 86_400)?;
        in_range("check_timeout_ms", self.check_timeout_ms, 100, 120_000)?;
        in_range("max_checks", self.max_checks, 1, 1000)?;
        in_range(
            "check_backoff_initial_ms",
            self.check_backoff_initial_ms,
            10,
            86_400_000,
        )?;
        if self.check_backoff_max_ms < self.check_backoff_initial_ms {
            return Err(invalid(
                "check_backoff_max_ms",
                format!(
                    "{} is below check_backoff_initial_ms = {}",
                    self.check_backoff_max_ms, self.check_backoff_initial_ms
                ),
            ));
        }
        in_range("check_concurrency", self.check_concurrency, 1, 1024)?;
        if let Some(token) = &self.check_bearer_token
            && token.expose_secret().trim().is_empty()
        {
            return Err(invalid(
                "check_bearer_token",
                "is empty: leave it out to send no Authorization header",
            ));
        }
        in_range("ack_timeout_secs", self.ack_timeout_secs, 1, 7 * 86_400)?;
        if self.ack_timeout_max_secs < self.ack_timeout_secs {
            return Err(invalid(
                "ack_timeout_max_secs",
                format!(
                    "{} is below ack_timeout_secs = {}",
                    self.ack_timeout_max_secs, self.ack_timeout_secs
                ),
            ));
        }
        in_range("max_deliveries", self.max_deliveries, 1, 100)?;
        in_range("poll_interval_ms", self.poll_interval_ms, 10, 60_000)?;
        self.validate_tokens()
    }

    fn validate_tokens(&self) -> Result<(), InvalidServiceConfig> {
        if self.tokens.is_empty() {
            return Err(invalid(
                "tokens",
                "no token is configured, so every request would be refused: add a [[service.tokens]] entry with name, scopes and token or token_env",
            ));
        }
        check_tokens(&self.tokens)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, InvalidServiceConfig> {
        self.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!(
                    "{:?} is not an address with a port, e.g. \"127.0.0.1:8080\"",
                    self.listen
                ),
            )
        })
    }

    /// The bearer tokens, reading `token_env` variables now.
    pub fn tokens(&self) -> Result<Tokens, InvalidServiceConfig> {
        read_tokens(&self.tokens)
    }

    pub fn settings(&self) -> ServiceSettings {
        ServiceSettings {
            max_payload_bytes: self.max_payload_bytes,
            prepare_timeout: Duration::from_secs(self.prepare_timeout_secs),
            check_timeout: Duration::from_millis(self.check_timeout_ms),
            max_checks: self.max_checks,
            check_backoff_initial: Duration::from_millis(self.check_backoff_initial_ms),
            check_backoff_max: Duration::from_millis(self.check_backoff_max_ms),
            check_concurrency: self.check_concurrency,
            check_bearer_token: self.check_bearer_token.clone(),
            ack: AckPolicy {
                ack_timeout: Duration::from_secs(self.ack_timeout_secs),
                ack_timeout_max: Duration::from_secs(self.ack_timeout_max_secs),
                max_deliveries: self.max_deliveries,
            },
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            finished_retention: Duration::from_secs(self.finished_retention_secs),
        }
    }
}

/// Checks `[[…tokens]]` entries (of `[service]` or `[dashboard]`) without reading the
/// environment; the error's key is relative to the section (`tokens[0].name`).
pub(crate) fn check_tokens(tokens: &[TokenConfig]) -> Result<(), InvalidServiceConfig> {
    for (index, token) in tokens.iter().enumerate() {
        let key = |field: &str| format!("tokens[{index}].{field}");
        if token.name.trim().is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        if tokens[..index].iter().any(|t| t.name == token.name) {
            return Err(invalid(
                key("name"),
                format!("{:?} is used by another token", token.name),
            ));
        }
        if token.scopes.is_empty() {
            return Err(invalid(
                key("scopes"),
                "must name at least one of producer, consumer, admin",
            ));
        }
        match (&token.token, &token.token_env) {
            (Some(secret), None) => check_token_len(&key("token"), secret.expose_secret())?,
            (None, Some(var)) if !var.trim().is_empty() => {}
            (None, Some(_)) => return Err(invalid(key("token_env"), "must not be empty")),
            _ => {
                return Err(invalid(
                    key("token"),
                    "set exactly one of token and token_env",
                ));
            }
        }
    }
    Ok(())
}

/// The bearer tokens of `[[…tokens]]` entries, reading `token_env` variables now.
pub(crate) fn read_tokens(tokens: &[TokenConfig]) -> Result<Tokens, InvalidServiceConfig> {
    let mut entries = Vec::with_capacity(tokens.len());
    for (index, token) in tokens.iter().enumerate() {
        let secret = match (&token.token, &token.token_env) {
            (Some(secret), _) => secret.clone(),
            (None, Some(var)) => {
                let key = format!("tokens[{index}].token_env");
                let value = std::env::var(var).map_err(|_| {
                    invalid(
                        &key,
                        format!("the environment variable {var} is not set (or not UTF-8)"),
                    )
                })?;
                check_token_len(&key, &value)?;
                SecretString::from(value)
            }
            (None, None) => {
                return Err(invalid(
                    format!("tokens[{index}].token"),
                    "set exactly one of token and token_env",
                ));
            }
        };
        entries.push((token.name.clone(), secret, token.scopes.clone()));
    }
    Ok(Tokens::new(entries))
}

fn check_token_len(key: &str, token: &str) -> Result<(), InvalidServiceConfig> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(invalid(
            key,
            format!(
                "is shorter than {MIN_TOKEN_LEN} characters: use a random one, e.g. `openssl rand -hex 24`"
            ),
        ));
    }
    Ok(())
}

/// What the service runs with; see [`ServiceConfig`] for each setting.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub max_payload_bytes: usize,
    pub prepare_timeout: Duration,
    pub check_timeout: Duration,
    pub max_checks: u32,
    pub check_backoff_initial: Duration,
    pub check_backoff_max: Duration,
    pub check_concurrency: u32,
    pub check_bearer_token: Option<SecretString>,
    pub ack: AckPolicy,
    pub poll_interval: Duration,
    pub finished_retention: Duration,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceConfig::default().settings()
    }
}

impl ServiceSettings {
    /// The wait after inconclusive check number `checks` (1 for the first).
    pub fn check_delay(&self, checks: u32) -> Duration {
        let doublings = checks.saturating_sub(1).min(20);
        self.check_backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.check_backoff_max)
    }

    /// How long a claimed check-back stays hidden from other instances: longer than the
    /// check can take, so that only a crashed checker's claim is taken over.
    pub fn check_claim(&self) -> Duration {
        self.check_timeout * 2 + Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token() -> ServiceConfig {
        ServiceConfig {
            tokens: vec![TokenConfig {
                name: "orders".into(),
                token: Some("0123456789abcdef0123".to_owned().into()),
                token_env: None,
                scopes: vec![Scope::Producer],
            }],
            ..ServiceConfig::default()
        }
    }

    #[test]
    fn defaults_with_a_token_are_valid() {
        with_token().validate().expect("valid");
        assert!(ServiceConfig::default().validate().is_err(), "no token");
    }

    #[test]
    fn errors_name_the_key() {
        let mut config = with_token();
        config.max_deliveries = 0;
        let err = config.validate().expect_err("refused");
        assert_eq!(err.key, "max_deliveries");
        assert!(err.to_string().contains("1 to 100"), "{err}");

        let mut config = with_token();
        config.listen = "localhost".into();
        assert_eq!(config.validate().expect_err("refused").key, "listen");

        let mut config = with_token();
        config.tokens[0].token = Some("tiny-secret".to_owned().into());
        let err = config.validate().expect_err("refused");
        assert_eq!(err.key, "tokens[0].token");
        assert!(err.to_string().contains("openssl"), "{err}");
        assert!(
            !err.to_string().contains("tiny-secret"),
            "the secret stays out: {err}"
        );

        let mut config = with_token();
        config.tokens[0].token_env = Some("X".into());
        assert!(
            config
                .validate()
                .expect_err("both")
                .reason
                .contains("exactly one")
        );

        let mut config = with_token();
        config.tokens.push(config.tokens[0].clone());
        assert_eq!(config.validate().expect_err("dup").key, "tokens[1].name");
    }

    #[test]
    fn token_env_is_read_when_the_service_starts() {
        let mut config = with_token();
        config.tokens[0].token = None;
        config.tokens[0].token_env = Some("FERRY_SERVICE_TEST_UNSET_TOKEN_VAR".into());
        config
            .validate()
            .expect("valid without reading the environment");
        let err = config.tokens().expect_err("unset");
        assert!(
            err.to_string()
                .contains("FERRY_SERVICE_TEST_UNSET_TOKEN_VAR"),
            "{err}"
        );
    }

    #[test]
    fn check_delay_doubles_up_to_the_maximum() {
        let settings = ServiceSettings {
            check_backoff_initial: Duration::from_millis(100),
            check_backoff_max: Duration::from_millis(500),
            ..ServiceSettings::default()
        };
        let delays: Vec<u128> = (1..=5)
            .map(|n| settings.check_delay(n).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(settings.check_delay(u32::MAX), Duration::from_millis(500));
    }
}
