//! `ferry relay`'s metrics and health endpoints, served when `[metrics] listen` is set:
//!
//! - `GET /metrics`: the Prometheus text of the process's registry (where the relay
//!   records), after reading the outbox's per-partition gauges from the store;
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 when the store answers, the sink is reachable and the last lease
//!   round reached the lease store (leases held or waited for); 503 otherwise, with each
//!   check's answer in a JSON body;
//! - `/dashboard`: the web dashboard when `[dashboard]` is enabled, once the store is open
//!   (503 before).
//!
//! The listener starts before the store and the sink are opened, so that an outage at
//! start reads as "alive, not ready" rather than as a dead process.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{info, warn};

use ferry::metric_names::{RELAY_ACK_LATENCY, RELAY_BATCH_SIZE};
use ferry::{ErrorChain, OutboxStore, RelayStats, Sink, record_outbox_status};
use ferry_service::Dashboard;
use ferry_service::dashboard::MetricsSource;

use crate::config::Config;

/// How long one check (or the status read of a scrape) may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often histogram samples are folded into their buckets between scrapes, so that
/// they do not pile up in memory when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Upper bounds of the commit-to-ack latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Upper bounds of the batch size buckets, in messages.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 10_000.0];

/// Installs the Prometheus exporter as the process's `metrics` recorder, with real
/// histogram buckets for the relay's histograms, and its upkeep for the life of the
/// process. Call it inside the runtime and before building the relay, which registers its
/// series with the recorder installed then.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(RELAY_ACK_LATENCY.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(RELAY_BATCH_SIZE.into()), &BATCH_BUCKETS)?
        .install_recorder()
        .context("installing the Prometheus metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// What the endpoints look at, each set once it exists.
#[derive(Default)]
struct Targets {
    store: OnceLock<Arc<dyn OutboxStore>>,
    sink: OnceLock<Arc<dyn Sink>>,
    relay: OnceLock<Arc<RelayStats>>,
    dashboard: OnceLock<Router>,
    /// Whether `/dashboard` is a dashboard not mounted yet (503) or none (404).
    dashboard_enabled: bool,
    /// Held while the outbox status is read for `/metrics` (see [`Endpoints::render`]).
    status_read: Arc<tokio::sync::Mutex<()>>,
}

/// The running endpoints, or nothing when `[metrics] listen` is not set (then every
/// method does nothing).
#[derive(Default)]
pub struct Health {
    endpoints: Option<Endpoints>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("serving", &self.endpoints.is_some())
            .finish()
    }
}

impl Health {
    /// Installs the recorder and serves the endpoints on `[metrics] listen` until
    /// `shutdown`, if it is set. Fails at once if the address cannot be bound, or if the
    /// dashboard is enabled without it.
    pub async fn start(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let Some(addr) = config.metrics.listen_addr()? else {
            if config.dashboard.enabled {
                bail!(
                    "dashboard.enabled = true, but metrics.listen is not set: ferry relay serves the dashboard there, e.g. metrics.listen = \"127.0.0.1:9464\""
                );
            }
            return Ok(Self::default());
        };
        let endpoints = Endpoints {
            handle: install_recorder()?,
            targets: Arc::new(Targets {
                dashboard_enabled: config.dashboard.enabled,
                ..Targets::default()
            }),
        };
        serve(addr, endpoints.clone(), shutdown).await?;
        Ok(Self {
            endpoints: Some(endpoints),
        })
    }

    fn targets(&self) -> Option<&Targets> {
        self.endpoints.as_ref().map(|endpoints| &*endpoints.targets)
    }

    pub fn watch_store(&self, store: Arc<dyn OutboxStore>) {
        if let Some(targets) = self.targets() {
            let _ = targets.store.set(store);
        }
    }

    pub fn watch_sink(&self, sink: Arc<dyn Sink>) {
        if let Some(targets) = self.targets() {
            let _ = targets.sink.set(sink);
        }
    }

    pub fn watch_relay(&self, stats: Arc<RelayStats>) {
        if let Some(targets) = self.targets() {
            let _ = targets.relay.set(stats);
        }
    }

    /// Serves `dashboard` under `/dashboard` on this listener from now on, with the figures
    /// of its `/metrics`.
    pub fn serve_dashboard(&self, dashboard: Dashboard, shutdown: &CancellationToken) {
        if let Some(endpoints) = &self.endpoints {
            let router = dashboard
                .with_metrics(Arc::new(endpoints.clone()))
                .into_router(shutdown.clone());
            let _ = endpoints.targets.dashboard.set(router);
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    handle: PrometheusHandle,
    targets: Arc<Targets>,
}

#[async_trait]
impl MetricsSource for Endpoints {
    /// Reads the outbox gauges first, unless an earlier scrape's read is still running:
    /// on a large backlog the status is a scan of the table, which goes on in the database
    /// after a scrape gives up waiting, and reads started by every scrape would pile up
    /// and starve the relay's own queries. One read at a time; a scrape that waits more
    /// than [`CHECK_TIMEOUT`] shows the gauges of the last read that completed.
    async fn render(&self) -> String {
        if let Some(store) = self.targets.store.get()
            && let Ok(reading) = Arc::clone(&self.targets.status_read).try_lock_owned()
        {
            let store = Arc::clone(store);
            let read = tokio::spawn(async move {
                let _reading = reading;
                match store.status().await {
                    Ok(status) => record_outbox_status(&status),
                    Err(err) => {
                        warn!(error = %ErrorChain(&err), "metrics: cannot read the outbox status")
                    }
                }
            });
            if timeout(CHECK_TIMEOUT, read).await.is_err() {
                warn!(
                    "metrics: the outbox status takes long to read (a large backlog?); this scrape shows the last gauges read, and none starts another read until it ends"
                );
            }
        }
        self.handle.render()
    }
}

async fn serve(
    addr: SocketAddr,
    endpoints: Endpoints,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
    info!(%addr, "metrics and health endpoints listening");
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(dashboard)
        .with_state(endpoints);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            warn!(error = %ErrorChain(&err), "the metrics and health endpoints failed");
        }
    });
    Ok(())
}

async fn metrics(State(endpoints): State<Endpoints>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        endpoints.render().await,
    )
        .into_response()
}

/// The dashboard's routes once it is mounted; 503 under `/dashboard` before, 404 elsewhere.
async fn dashboard(State(endpoints): State<Endpoints>, request: Request) -> Response {
    match endpoints.targets.dashboard.get() {
        Some(router) => match router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None if endpoints.targets.dashboard_enabled
            && request.uri().path().starts_with("/dashboard") =>
        {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the dashboard starts once the store is reachable (see /readyz)",
            )
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({ "status": "alive" }))).into_response()
}

async fn readyz(State(endpoints): State<Endpoints>) -> Response {
    let targets = &endpoints.targets;
    let (store, sink) = tokio::join!(check_store(targets), check_sink(targets));
    let leases = check_leases(targets);
    let ready = store.is_ok() && sink.is_ok() && leases.is_ok();
    let answer = |check: Result<(), String>| match check {
        Ok(()) => Value::from("ok"),
        Err(why) => Value::from(why),
    };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "store": answer(store),
            "sink": answer(sink),
            "leases": answer(leases),
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// One trivial query: the outbox's partition count.
async fn check_store(targets: &Targets) -> Result<(), String> {
    let store = targets.store.get().ok_or("not connected yet")?;
    match timeout(CHECK_TIMEOUT, store.partitions()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(ErrorChain(&err).to_string()),
        Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    }
}

async fn check_sink(targets: &Targets) -> Result<(), String> {
    let sink = targets.sink.get().ok_or("not connected yet")?;
    match timeout(CHECK_TIMEOUT, sink.check()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(ErrorChain(&err).to_string()),
        Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    }
}

fn check_leases(targets: &Targets) -> Result<(), String> {
    let relay = targets.relay.get().ok_or("the relay has not started")?;
    if relay
        .leases_reached
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        Ok(())
    } else {
        Err("the last lease round did not reach the lease store (or none has run yet)".into())
    }
}
