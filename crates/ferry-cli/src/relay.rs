//! `ferry relay`: the relay, with its metrics and health endpoints when `[metrics] listen`
//! is set (and the web dashboard there when `[dashboard]` is enabled), and its batch spans
//! exported when `[tracing] otlp_endpoint` is.

use std::path::Path;

use anyhow::Context;

use ferry_cli::config::Config;
use ferry_cli::health::Health;
use ferry_cli::process::shutdown_on_signal;
use ferry_cli::telemetry::Telemetry;
use ferry_cli::wiring;

pub(crate) async fn run(path: &Path, telemetry: &Telemetry) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let spans = telemetry.export_spans(&config.tracing)?;
    let shutdown = shutdown_on_signal()?;
    // Before the relay is built: it registers its metrics with the recorder installed here.
    let health = Health::start(&config, &shutdown).await?;
    let Some(store) =
        wiring::retry_until_ready("store", &shutdown, || wiring::Store::open(&config)).await?
    else {
        return Ok(());
    };
    health.watch_store(store.outbox());
    let Some(leases) = wiring::retry_until_ready("leases", &shutdown, || {
        wiring::Leases::open(&config, &store)
    })
    .await?
    else {
        return Ok(());
    };
    let Some(sink) =
        wiring::retry_until_ready("sink", &shutdown, || wiring::open_sink(&config.sink)).await?
    else {
        return Ok(());
    };
    health.watch_sink(sink.clone());
    let mut relay = ferry::Relay::new(
        store.outbox(),
        leases.lease_store(),
        sink,
        config.relay_config(),
    );
    if let Some(capture) = wiring::log_capture(&config, &store)? {
        relay = relay.with_log_capture(capture);
    }
    health.watch_relay(relay.stats());
    if let Some(dashboard) = ferry_cli::dashboard::build(&config, &store, Some(relay.stats()))? {
        health.serve_dashboard(dashboard, &shutdown);
    }
    let outcome = relay.run(shutdown).await.context("relay stopped");
    if let Some(spans) = spans {
        spans.shutdown().await;
    }
    outcome
}
