//! The web dashboard of `[dashboard]`, built the same way for `ferry serve` (on
//! `service.listen`) and `ferry relay` (on `metrics.listen`).

use std::sync::Arc;

use async_trait::async_trait;

use ferry::{ErrorChain, RelayStats, Sink};
use ferry_service::Dashboard;
use ferry_service::dashboard::ReplaySink;

use crate::config::{Config, SinkConfig};
use crate::wiring::{self, Store};

/// Replays from the dashboard go to the configured sink, opened anew per replay as
/// `ferry replay` opens it.
struct ConfiguredSink(SinkConfig);

#[async_trait]
impl ReplaySink for ConfiguredSink {
    async fn open(&self, name: &str) -> Result<Arc<dyn Sink>, String> {
        wiring::open_sink(&self.0.clone().for_replay(name))
            .await
            .map_err(|err| ErrorChain(err.as_ref()).to_string())
    }
}

/// The dashboard of `store`'s outbox, showing the publish rate of the relay running in
/// this process if there is one, and replaying to the configured sink; `None` when
/// `[dashboard]` is not enabled.
pub fn build(
    config: &Config,
    store: &Store,
    relay: Option<Arc<RelayStats>>,
) -> anyhow::Result<Option<Dashboard>> {
    if !config.dashboard.enabled {
        return Ok(None);
    }
    let mut dashboard = Dashboard::new(
        store.admin()?,
        store.outbox(),
        config.dashboard_tokens()?,
        config.dashboard.settings(),
    )
    .with_replay_sink(Arc::new(ConfiguredSink(config.sink.clone())));
    if let Some(stats) = relay {
        dashboard = dashboard.with_relay(stats);
    }
    Ok(Some(dashboard))
}
