//! `[metrics]`: where `ferry relay` serves its Prometheus metrics and health checks.

use std::net::SocketAddr;

use anyhow::anyhow;
use serde::Deserialize;

/// Off unless `listen` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// The address of `GET /metrics`, `/healthz` and `/readyz`, e.g. `"127.0.0.1:9464"`
    /// (`"0.0.0.0:9464"` for every interface). Defaults to none: nothing is served.
    pub listen: Option<String>,
}

impl MetricsSection {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr().map(drop)
    }

    /// The address to serve on, if any.
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.listen
            .as_deref()
            .map(|listen| {
                listen.parse().map_err(|_| {
                    anyhow!(
                        "metrics.listen = {listen:?} is not an IP address with a port: use e.g. \"127.0.0.1:9464\", or \"0.0.0.0:9464\" for every interface"
                    )
                })
            })
            .transpose()
    }
}
