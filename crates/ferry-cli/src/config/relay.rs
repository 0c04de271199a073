//! `[relay]`: how the relay runs.

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

/// `relay.poll_interval_ms` unless set.
pub(super) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(1000);
/// `relay.poll_interval_ms` unless set, on PostgreSQL with `outbox.wake = "poll"`: whoever
/// turns the notifications off for producers' sake still expects rows within moments, and
/// an idle partition's poll there is one index probe.
pub(super) const POLLED_POSTGRES_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How the relay runs; see `ferry_core::RelayConfig` for what each setting does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// Unique among relays sharing the outbox. Defaults to `<hostname>-<pid>`.
    pub relay_id: Option<String>,
    /// Defaults to 1000.
    pub batch_size: usize,
    /// Defaults to 10.
    pub lease_ttl_secs: u64,
    /// How often an idle partition is looked at again when no wake-up comes: the pick-up
    /// latency on stores without notifications (SQLite, MySQL, PostgreSQL with
    /// `outbox.wake = "poll"`). Defaults to 1000; 100 on PostgreSQL with
    /// `outbox.wake = "poll"`, whose relay has nothing else to find rows by.
    pub poll_interval_ms: Option<u64>,
    /// Defaults to 100.
    pub retry_initial_ms: u64,
    /// Defaults to 30000.
    pub retry_max_ms: u64,
    /// Defaults to 10.
    pub shutdown_timeout_secs: u64,
    /// How often published messages past `outbox.retention_secs` are purged. Defaults to 60.
    pub purge_interval_secs: u64,
    /// What a message the sink rejects for good does: `"block"` (its partition stops until
    /// it passes or an operator skips it) or `"park-aggregate"` (it and its aggregate's
    /// later messages are parked until requeued; the rest flows). Defaults to `"block"`.
    pub on_permanent_failure: PermanentFailurePolicy,
}

/// `relay.on_permanent_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PermanentFailurePolicy {
    #[default]
    Block,
    ParkAggregate,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            relay_id: None,
            batch_size: 1000,
            lease_ttl_secs: 10,
            poll_interval_ms: None,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            shutdown_timeout_secs: 10,
            purge_interval_secs: 60,
            on_permanent_failure: PermanentFailurePolicy::Block,
        }
    }
}

impl RelaySection {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if !(1..=10_000).contains(&self.batch_size) {
            bail!(
                "relay.batch_size = {} is out of range: use 1 to 10000",
                self.batch_size
            );
        }
        if self.lease_ttl_secs < 2 {
            bail!(
                "relay.lease_ttl_secs = {} is too short: use at least 2",
                self.lease_ttl_secs
            );
        }
        if self.poll_interval_ms == Some(0) || self.retry_initial_ms == 0 {
            bail!("relay.poll_interval_ms and relay.retry_initial_ms must be at least 1");
        }
        if self.retry_max_ms < self.retry_initial_ms {
            bail!(
                "relay.retry_max_ms = {} is below relay.retry_initial_ms = {}",
                self.retry_max_ms,
                self.retry_initial_ms
            );
        }
        if self.purge_interval_secs == 0 {
            bail!("relay.purge_interval_secs must be at least 1");
        }
        if let Some(id) = &self.relay_id
            && id.trim().is_empty()
        {
            bail!("relay.relay_id must not be empty (leave it out for <hostname>-<pid>)");
        }
        Ok(())
    }

    /// The relay's settings; `external_leases` when `[leases]` is outside the store;
    /// `default_poll_interval` where `poll_interval_ms` is not set.
    pub(super) fn relay_config(
        &self,
        external_leases: bool,
        default_poll_interval: Duration,
    ) -> ferry::RelayConfig {
        let mut config =
            ferry::RelayConfig::new(self.relay_id.clone().unwrap_or_else(default_relay_id));
        config.batch_size = self.batch_size;
        config.lease_ttl = Duration::from_secs(self.lease_ttl_secs);
        config.poll_interval = self
            .poll_interval_ms
            .map_or(default_poll_interval, Duration::from_millis);
        config.retry_initial = Duration::from_millis(self.retry_initial_ms);
        config.retry_max = Duration::from_millis(self.retry_max_ms);
        config.shutdown_timeout = Duration::from_secs(self.shutdown_timeout_secs);
        config.purge_interval = Duration::from_secs(self.purge_interval_secs);
        config.on_permanent_failure = match self.on_permanent_failure {
            PermanentFailurePolicy::Block => ferry::OnPermanentFailure::Block,
            PermanentFailurePolicy::ParkAggregate => ferry::OnPermanentFailure::ParkAggregate,
        };
        config.external_leases = external_leases;
        config
    }
}

fn default_relay_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into());
    format!("{host}-{}", std::process::id())
}
