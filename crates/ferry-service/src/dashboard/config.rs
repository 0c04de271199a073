//! The `[dashboard]` section of `ferry.toml`.

use std::time::Duration;

use serde::Deserialize;

use crate::auth::Tokens;
use crate::config::{TokenConfig, check_tokens, read_tokens};

/// Settings of the web dashboard. Every key is optional; the defaults are:
///
/// - `enabled = false`: serve the dashboard under `/dashboard` on `ferry serve`'s
///   listener (`service.listen`) and on `ferry relay`'s (`metrics.listen`).
/// - `tokens`: `[[dashboard.tokens]]` entries, the same shape as `[[service.tokens]]`;
///   unset, the dashboard takes the service's. Signing in and acting need an `admin` one.
/// - `public_read = false`: the pages need an admin token too (a login form that sets a
///   cookie, or `Authorization: Bearer`). `true` opens the read-only views to anyone who
///   reaches the listener; actions always need an admin token.
/// - `refresh_ms = 2000`: how often an open page refreshes its figures.
/// - `sample_interval_secs = 5`: how often the backlog and the publish rate are sampled
///   for the history (kept in this process's memory).
/// - `history_minutes = 15`: how much history is kept and shown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    pub enabled: bool,
    pub public_read: bool,
    pub refresh_ms: u64,
    pub sample_interval_secs: u64,
    pub history_minutes: u64,
    pub tokens: Vec<TokenConfig>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            public_read: false,
            refresh_ms: 2000,
            sample_interval_secs: 5,
            history_minutes: 15,
            tokens: Vec::new(),
        }
    }
}

/// A `[dashboard]` setting that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting dashboard.{key}: {reason}")]
#[non_exhaustive]
pub struct InvalidDashboardConfig {
    pub key: String,
    pub reason: String,
}

fn in_range(
    key: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), InvalidDashboardConfig> {
    if value < min || value > max {
        return Err(InvalidDashboardConfig {
            key: key.into(),
            reason: format!("{value} is out of range: use {min} to {max}"),
        });
    }
    Ok(())
}

impl DashboardConfig {
    pub fn validate(&self) -> Result<(), InvalidDashboardConfig> {
        in_range("refresh_ms", self.refresh_ms, 200, 600_000)?;
        in_range("sample_interval_secs", self.sample_interval_secs, 1, 3600)?;
        in_range("history_minutes", self.history_minutes, 1, 24 * 60)?;
        if self.history_minutes * 60 < self.sample_interval_secs * 2 {
            return Err(InvalidDashboardConfig {
                key: "history_minutes".into(),
                reason: format!(
                    "{} minutes hold fewer than two samples of sample_interval_secs = {}: keep more history or sample more often",
                    self.history_minutes, self.sample_interval_secs
                ),
            });
        }
        check_tokens(&self.tokens).map_err(|err| InvalidDashboardConfig {
            key: err.key,
            reason: err.reason,
        })
    }

    /// The tokens of `[[dashboard.tokens]]`, reading `token_env` variables now; `None`
    /// when there are none (the dashboard then takes the service's).
    pub fn own_tokens(&self) -> Result<Option<Tokens>, InvalidDashboardConfig> {
        if self.tokens.is_empty() {
            return Ok(None);
        }
        read_tokens(&self.tokens)
            .map(Some)
            .map_err(|err| InvalidDashboardConfig {
                key: err.key,
                reason: err.reason,
            })
    }

    pub fn settings(&self) -> DashboardSettings {
        DashboardSettings {
            public_read: self.public_read,
            refresh: Duration::from_millis(self.refresh_ms),
            sample_interval: Duration::from_secs(self.sample_interval_secs),
            history: Duration::from_secs(self.history_minutes * 60),
        }
    }
}

/// What the dashboard runs with; see [`DashboardConfig`].
#[derive(Debug, Clone)]
pub struct DashboardSettings {
    pub public_read: bool,
    pub refresh: Duration,
    pub sample_interval: Duration,
    pub history: Duration,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardConfig::default().settings()
    }
}

impl DashboardSettings {
    /// Samples kept: the history plus one, so the oldest rate spans all of it.
    pub(super) fn history_samples(&self) -> usize {
        let interval = self.sample_interval.as_secs_f64().max(0.001);
        (self.history.as_secs_f64() / interval).ceil() as usize + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        DashboardConfig::default().validate().expect("valid");
        let config = DashboardConfig {
            refresh_ms: 10,
            ..DashboardConfig::default()
        };
        let err = config.validate().expect_err("too fast");
        assert_eq!(err.key, "refresh_ms");
        assert!(err.to_string().contains("200 to 600000"), "{err}");
        let config = DashboardConfig {
            history_minutes: 1,
            sample_interval_secs: 60,
            ..DashboardConfig::default()
        };
        assert_eq!(
            config.validate().expect_err("one sample").key,
            "history_minutes"
        );
        assert_eq!(DashboardSettings::default().history_samples(), 181);
    }
}
