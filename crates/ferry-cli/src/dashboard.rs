//! The web dashboard of `[dashboard]`, built the same way for `ferry serve` (on
//! `service.listen`) and `ferry relay` (on `metrics.listen`).

use std::sync::Arc;

use ferry::RelayStats;
use ferry_service::Dashboard;

use crate::config::Config;
use crate::wiring::Store;

/// The dashboard of `store`'s outbox, showing the publish rate of the relay running in
/// this process if there is one; `None` when `[dashboard]` is not enabled.
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
    );
    if let Some(stats) = relay {
        dashboard = dashboard.with_relay(stats);
    }
    Ok(Some(dashboard))
}
