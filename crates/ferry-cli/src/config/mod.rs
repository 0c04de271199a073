//! The `ferry.toml` file: TOML, then `FERRY_<SECTION>__<KEY>` environment overrides (e.g.
//! `FERRY_STORE__URL`, see `env.rs`), then command-line flags. Unknown keys are errors. One
//! module per section; `Config` checks what spans sections.

mod capture;
mod env;
mod leases;
mod metrics;
mod relay;
mod sink;
mod store;
mod telemetry;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

use ferry::redis_store::{KeyPrefix, RedisSettings};
use ferry::sql::{StoreSettings, TablePrefix, Wake};
use ferry_service::{DashboardConfig, ServiceConfig, TokenConfig, Tokens};

pub use capture::{CaptureMode, CaptureSection};
pub use leases::LeasesConfig;
pub use metrics::MetricsSection;
pub use relay::RelaySection;
pub use sink::SinkConfig;
#[cfg(not(feature = "kafka"))]
pub use sink::kafka_not_built;
pub use store::{OutboxConfig, SERVICE_STORES, StoreConfig};
pub use telemetry::TracingSection;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub store: StoreConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    pub sink: SinkConfig,
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub leases: LeasesConfig,
    /// How the relay learns of new rows: polling (default) or the database's log.
    #[serde(default)]
    pub capture: CaptureSection,
    /// `ferry relay`'s metrics and health endpoints.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The reliable message service (`ferry serve`); its tables are created by `ferry
    /// migrate` when this section is present.
    #[serde(default)]
    pub service: Option<ServiceConfig>,
    /// Exporting the relay's spans over OTLP.
    #[serde(default)]
    pub tracing: TracingSection,
    /// The web dashboard, served under `/dashboard` by `ferry serve` (on `service.listen`)
    /// and `ferry relay` (on `metrics.listen`) when enabled.
    #[serde(default)]
    pub dashboard: DashboardConfig,
}

impl Config {
    /// Reads `path`, applies `FERRY_<SECTION>__<KEY>` overrides and validates.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            bail!(
                "config file {} not found (examples/ has one per store and sink)",
                path.display()
            );
        }
        Self::from_figment(Figment::from(Toml::file_exact(path)))
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses TOML text (with env overrides) and validates: for configs made in code.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> anyhow::Result<Self> {
        let config: Self = figment
            .merge(env::overrides())
            .extract()
            .map_err(|errors| {
                let lines: Vec<String> = errors.into_iter().map(|e| env::describe(&e)).collect();
                anyhow::anyhow!(lines.join("; "))
            })?;
        config.validate().map_err(env::name_overrides_in)?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.outbox.validate()?;
        self.outbox.validate_wake(&self.store)?;
        self.relay.validate()?;
        self.metrics.validate()?;
        self.store.validate()?;
        self.sink.validate()?;
        self.tracing.validate()?;
        if let Some(service) = &self.service {
            if !self.store.holds_service() {
                bail!(SERVICE_STORES);
            }
            service.validate()?;
            if service.max_payload_bytes > self.outbox.max_payload_bytes {
                bail!(
                    "service.max_payload_bytes = {} exceeds outbox.max_payload_bytes = {}: the outbox would refuse confirmed messages; lower the first or raise the second",
                    service.max_payload_bytes,
                    self.outbox.max_payload_bytes
                );
            }
        }
        self.validate_dashboard()?;
        self.capture
            .validate(&self.store, self.relay.on_permanent_failure)?;
        self.leases.validate()
    }

    fn validate_dashboard(&self) -> anyhow::Result<()> {
        self.dashboard.validate()?;
        if !self.dashboard.enabled {
            return Ok(());
        }
        if self.metrics.listen.is_none() && self.service.is_none() {
            bail!(
                "dashboard.enabled = true, but nothing serves it: set metrics.listen (ferry relay serves it there) or add a [service] section (ferry serve serves it on service.listen)"
            );
        }
        let (tokens, section) = self.dashboard_token_entries();
        if tokens.is_empty() {
            bail!(
                "dashboard.enabled = true, but no token can sign in: add a [[dashboard.tokens]] entry with name, token (or token_env) and scopes = [\"admin\"]"
            );
        }
        if !tokens.iter().any(TokenConfig::is_admin) {
            bail!(
                "dashboard.enabled = true, but no token of [[{section}]] has the admin scope, which signing in and acting need: give one scopes = [\"admin\"]"
            );
        }
        Ok(())
    }

    /// The dashboard's token entries and their section: its own, else the service's.
    fn dashboard_token_entries(&self) -> (&[TokenConfig], &'static str) {
        match &self.service {
            Some(service) if self.dashboard.tokens.is_empty() => {
                (&service.tokens, "service.tokens")
            }
            _ => (&self.dashboard.tokens, "dashboard.tokens"),
        }
    }

    /// The tokens that may sign in to the dashboard and act: `[[dashboard.tokens]]`, else
    /// `[[service.tokens]]`; reads `token_env` variables now.
    pub fn dashboard_tokens(&self) -> anyhow::Result<Tokens> {
        if let Some(tokens) = self.dashboard.own_tokens()? {
            return Ok(tokens);
        }
        match &self.service {
            Some(service) => Ok(service.tokens()?),
            None => bail!(
                "the dashboard has no tokens: add [[dashboard.tokens]] (or [[service.tokens]])"
            ),
        }
    }

    pub fn store_settings(&self) -> StoreSettings {
        StoreSettings {
            table_prefix: TablePrefix::new(self.outbox.table_prefix.clone()).unwrap_or_default(),
            max_payload_bytes: self.outbox.max_payload_bytes,
            retention: Duration::from_secs(self.outbox.retention_secs),
            external_leases: self.leases.is_external(),
            wake: self.wake(),
        }
    }

    /// `outbox.wake`, or its default: no notifications in log mode, where the relay
    /// streams the log and never listens (the trigger would only slow producers down).
    pub fn wake(&self) -> Wake {
        self.outbox.wake.unwrap_or(if self.capture.is_log() {
            Wake::Poll
        } else {
            Wake::Notify
        })
    }

    /// The Redis store's settings: its key prefix and the shared `[outbox]` settings.
    pub fn redis_settings(&self, key_prefix: &str) -> RedisSettings {
        RedisSettings {
            key_prefix: KeyPrefix::new(key_prefix).unwrap_or_default(),
            max_payload_bytes: self.outbox.max_payload_bytes,
            retention: Duration::from_secs(self.outbox.retention_secs),
            external_leases: self.leases.is_external(),
        }
    }

    pub fn relay_config(&self) -> ferry::RelayConfig {
        // In log mode the interval is how long the stream may stay silent: not a poll.
        let polled_postgres = matches!(self.store, StoreConfig::Postgres { .. })
            && !self.capture.is_log()
            && self.wake() == Wake::Poll;
        let default_poll_interval = if polled_postgres {
            relay::POLLED_POSTGRES_POLL_INTERVAL
        } else {
            relay::DEFAULT_POLL_INTERVAL
        };
        self.relay
            .relay_config(self.leases.is_external(), default_poll_interval)
    }
}
