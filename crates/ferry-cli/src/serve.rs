//! `ferry serve`: the reliable message service, with the relay in the same process unless
//! `service.run_relay = false`.

use std::path::Path;

use anyhow::Context;
use tokio::net::TcpListener;

use ferry_cli::config::Config;
use ferry_cli::process::shutdown_on_signal;
use ferry_cli::telemetry::Telemetry;
use ferry_cli::wiring;
use ferry_service::Service;
use tracing::info;

pub(crate) async fn run(path: &Path, telemetry: &Telemetry) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let spans = telemetry.export_spans(&config.tracing)?;
    let service_config = config.service.as_ref().with_context(|| {
        format!(
            "{} has no [service] section (examples/sqlite-service.toml has one)",
            path.display()
        )
    })?;
    let tokens = service_config.tokens()?;
    let addr = service_config.listen_addr()?;
    let shutdown = shutdown_on_signal()?;
    let Some(store) =
        wiring::retry_until_ready("store", &shutdown, || wiring::Store::open(&config)).await?
    else {
        return Ok(());
    };
    let service_store = store.service()?;
    // Fails at once, pointing at `ferry migrate`, when the service's tables are missing.
    service_store
        .stats()
        .await
        .context("reading the service's tables")?;
    // Installed before the relay is built, which registers its metrics with it; rendered
    // after the service's own on `/metrics`.
    let process_metrics = if service_config.run_relay {
        Some(ferry_cli::health::install_recorder()?)
    } else {
        None
    };
    let relay = if service_config.run_relay {
        let Some(sink) =
            wiring::retry_until_ready("sink", &shutdown, || wiring::open_sink(&config.sink))
                .await?
        else {
            return Ok(());
        };
        Some(ferry::Relay::new(
            store.outbox(),
            store.leases(),
            sink,
            config.relay_config(),
        ))
    } else {
        None
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (service.listen)"))?;
    let mut service = Service::new(service_store, service_config.settings(), tokens)
        .with_outbox_metrics(store.outbox())
        .with_operations(store.admin()?);
    if let Some(handle) = process_metrics {
        service = service.with_process_metrics(handle);
    }
    if let Some(dashboard) =
        ferry_cli::dashboard::build(&config, &store, relay.as_ref().map(ferry::Relay::stats))?
    {
        service = service.with_dashboard(dashboard);
        info!(url = %format!("http://{addr}/dashboard"), "dashboard enabled");
    }
    let relay_task = relay.map(|relay| {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let result = relay.run(shutdown.clone()).await;
            // A relay that cannot go on takes the service down with it, visibly.
            shutdown.cancel();
            result
        })
    });
    let served = service.run(listener, shutdown.clone()).await;
    shutdown.cancel();
    let relayed = match relay_task {
        Some(task) => task
            .await
            .context("the relay task panicked")
            .and_then(|outcome| outcome.context("relay stopped")),
        None => Ok(()),
    };
    if let Some(spans) = spans {
        spans.shutdown().await;
    }
    relayed?;
    served.context("service stopped")
}
